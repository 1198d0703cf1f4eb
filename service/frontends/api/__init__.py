"""The JSON API: one router per resource (predict, models, health, attention, docs)."""
