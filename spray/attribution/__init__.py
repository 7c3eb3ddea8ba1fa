"""Attribution stage: LRP heatmaps and per-channel concept relevances for a whole dataset."""
