"""expand-reduce-service: an async REST job service running uniflow's ExpandReduceFlow."""
