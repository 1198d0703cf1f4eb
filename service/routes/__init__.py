"""One router per resource: predict, attention, models, health (and request metrics)."""
