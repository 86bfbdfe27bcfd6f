"""The benchmark on shaped links (``make bench-wan``): sites and the aggregator in network namespaces.

``netns`` builds the namespaces and veth pairs (a bridge in a switch namespace joins them) and
tears them down; ``shaping`` puts a tbf rate limit on each veth end; ``delay`` is the userspace
delay line that adds the round-trip time (the kernel here lacks netem); ``probe`` and ``check``
verify that the shaping holds; ``inns`` runs the existing round runners (ours, Flower, NVIDIA
FLARE) with their processes inside the namespaces; ``site`` is our site with a codec choice;
``report`` writes the table and ``run`` drives it all.
"""
