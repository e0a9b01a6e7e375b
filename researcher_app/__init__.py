"""What runs on a researcher's machine: a spec made into a FLARE job, and FLARE's Session API.

It composes both sides (a job names the site's and the server's components), so it lives
above them: ``simulator`` and the CLI use it; no site or server code imports it.
"""
