"""One causal LM that embeds and generates, adapted per task by TMoLE."""
