"""The bundle contract shared by the offline side and the serving side.

A bundle is a registry version: manifest, checksums and the files the runtimes load. ``distill``
writes bundles, ``serving`` reads them; neither imports the other, both import this package.
"""
