"""sae-kit"""
