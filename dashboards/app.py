"""The Streamlit script of the feature browser: `sae-kit browse RUN_OR_SAE_DIR` runs it (see pages.main)."""

from sae_kit.dashboards.pages import main

main()
