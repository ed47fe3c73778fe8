"""RFC 7030 EST client.

- `wire`: bodies, media types and headers as RFC 7030 / RFC 2045 and real servers write them
- `csrattrs`: /csrattrs -> what the CSR should look like (pure)
- `csr`: CSRs from a plan, from the certificate being renewed, rebound to a new tls-unique
- `response`: PKCS#7 certs-only parsing and validation of the issued certificate (pure)
- `transport`: HTTPS over a socket we control (tls-unique of the very connection)
- `client`: the four operations, the 401 challenge, 202 pending, proof-of-possession
- `trust`: explicit trust anchor or fingerprint bootstrap
- `pending`: a 202'd request persisted across restarts
- `auth`: HTTP Basic credentials from a private file
"""
