"""The Lifeboat mobility agent: tracks changed blocks of protected disks and ships them.

Standalone: no Django, and only the small set of dependencies in mobility/requirements.txt.
"""
