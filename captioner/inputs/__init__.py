"""Reading inputs safely: image.py (one image file -> RGB), audio.py (one sound file -> mono samples),
jpeg.py (raw JPEG bytes decoded in batches on the device), and loader.py (the one loader: items ->
(key, model inputs | error)) used by captioning, sharded captioning and feature encoding.
"""
