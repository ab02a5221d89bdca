"""sae_kit.dashboards"""
