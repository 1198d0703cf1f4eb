"""The data plane: image bytes or pixels in, model outputs out (decode, batch, run)."""
