"""Audio-text retrieval: the contrastive loss and the retrieval-only modules (TAP, linear projection)."""
