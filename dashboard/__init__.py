"""The sae Streamlit dashboard (dashboard/app.py is the entry point)."""
