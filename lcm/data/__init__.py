"""Data stages: synthetic benchmark, COCO/VOC preparation, WebDataset shards, label masks."""
