"""Training data: feature shards (`<root>/features/NNNNN.tar`) streamed to ranks and loader workers."""
