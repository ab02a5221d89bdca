"""sae_kit.eval"""
