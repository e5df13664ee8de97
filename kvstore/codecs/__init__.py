"""Codecs. Importing this package registers every codec: one import per codec module."""

from kvstore.codecs import cachegen as cachegen
from kvstore.codecs import lossless as lossless
from kvstore.codecs import quant as quant
from kvstore.codecs import raw as raw
