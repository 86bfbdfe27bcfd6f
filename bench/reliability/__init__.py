"""The reliability campaign (``make reliability``): faults injected into real daemons and sites.

Each module is one kind of fault or one part of the harness: ``daemon`` runs ``gdfed serve`` as a
process, ``proxy`` sits between sites and the daemon and cuts, resets and delays connections,
``sites`` drives scripted sites that retry the way a worker does, ``kills`` SIGKILLs the daemon
under every method and optimizer, ``workers`` SIGKILLs real worker processes, ``disk`` fills the
disk, ``fuzz`` sends random and mutated messages, ``load`` runs many concurrent sites,
``hostile`` plays the malicious sites, ``report`` writes docs/reliability.{md,json} and
``campaign`` runs them all.
"""
