"""raymoe: elastic Mixture-of-Experts training and serving on Ray.

Importing this package loads neither ray nor torch; import the subpackages you need.
"""

__version__ = "0.1.0"
