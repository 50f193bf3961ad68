"""The AttentionInfluence method: selector models, retrieval-head detection, masking, scoring, selection."""
