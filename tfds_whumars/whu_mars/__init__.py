"""The `whu_mars` TFDS dataset folder; importing it registers the builder."""
from tfds_whumars.whu_mars.whu_mars_dataset_builder import Builder
from tfds_whumars.whu_mars.whu_mars_dataset_builder import WhuMarsConfig
