"""SeedNet training: model, data, training loop, export and publishing."""
