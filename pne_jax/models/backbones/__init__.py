"""Backbones: each returns its list of feature maps [B, H_i, W_i, C_i], finest first."""
