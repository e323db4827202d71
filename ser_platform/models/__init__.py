"""The paper's model: speech and text embedding networks, crossmodal transformer with focus attention."""
