"""The model lifecycle: a registry version verified, exported, opened, chosen, swapped."""
