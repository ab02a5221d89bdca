"""sae_kit.training"""
