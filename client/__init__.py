"""The hospital side of LowMag: ``lowmag send`` exports a scan at 5x, uploads it to a portal
with tus and follows the analysis to its result.

- ``client.tus``: the tus 1.0 wire format (versions, header names, metadata, checksums), the
  one definition both this client and the portal's upload endpoint (``portal.uploads``) use.
- ``client.prepare``: the file to send (a cached 5x export, or the original).
- ``client.sender``: the resumable tus uploader, the portal's HTTP API, following a job to its
  prediction. ``client.errors``: what a send can fail with.
- ``client.command``: the ``lowmag send`` sub-command.

It imports the science library (``analysis``) for the export, and nothing of the portal.
"""
