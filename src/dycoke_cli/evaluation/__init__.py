"""Methods side by side: `dycoke compare` on one clip (compare.py), `dycoke eval` on a QA file
(qa.py) with its statistics (stats.py); the methods they run are parsed in methods.py."""
