"""The one compiled part: region-of-interest JPEG decoding (src/cnnlab/data/_jpeg_region.c) against the system's
libjpeg-turbo. It is optional: without a C compiler or libjpeg's headers the install goes on, and streaming
decodes whole JPEGs with simplejpeg or Pillow instead (cnnlab.data.transforms says which it uses)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cnnlab.data._jpeg_region", sources=["src/cnnlab/data/_jpeg_region.c"], libraries=["jpeg"], optional=True
        )
    ]
)
