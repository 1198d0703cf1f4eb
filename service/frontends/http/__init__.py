"""HTTP plumbing shared by the JSON API and the inference protocol's REST routes."""
