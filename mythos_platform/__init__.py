"""The Ray layer of Mythos: config, data, training, tuning, serving and tracking.

Named `mythos_platform`, not `platform`: that name is a standard-library module that
Ray, torch and pip import, so a package called `platform` would shadow it.
"""
