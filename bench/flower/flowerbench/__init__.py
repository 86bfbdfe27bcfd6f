"""A Flower App for bench/peers.py: FedAvg of GPT-2-small-shaped numpy arrays, trivial local training."""
