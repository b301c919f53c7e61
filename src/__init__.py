"""ArcFace face recognition on MindSpore."""
