"""Data ingestion: the ISLES 2018 converter, the synthetic CTP phantom, the dataset check and fold selection."""
