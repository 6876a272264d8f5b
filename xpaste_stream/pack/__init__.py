"""Background packing: real annotated datasets (COCO, LVIS) -> background shards."""

from .coco import PackCocoConfig, category_table, load_dataset, run_pack_coco

__all__ = ["PackCocoConfig", "category_table", "load_dataset", "run_pack_coco"]
