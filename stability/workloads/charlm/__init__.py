"""The character-LM workload and its text-data code."""
