"""Quality: shell statistics (CC1/2, CCanom, completeness), live feedback, forecasts,
anomalous peak heights and comparison with a known truth (docs/architecture.md)."""
