"""The data floor: image folders (files.py), DINO multi-crop (multicrop.py), the resumable sharded loader
(loader.py) and the embedded demo data set (demo.py). It knows no model and no method: a method says
which crops it wants by the transform it passes in.
"""
