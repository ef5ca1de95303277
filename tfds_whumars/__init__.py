"""WHU-MARS as a TensorFlow-Datasets dataset (no TensorFlow needed), and a synthetic WHU-MARS.

Modules: raw_layout (the archive's layout, shared), whu_mars/ (the TFDS builder), build (the build
command), synthetic (the generator), jpeg_check, statistics. Importing this package imports
nothing heavy; import `tfds_whumars.whu_mars` to register the `whu_mars` builder with TFDS.
"""
