"""Linear algebra on a symmetric operator seen only through block matvecs: Lanczos, SLQ, trace.

Nothing here knows about models or data; see the README's "Architecture" section.
"""
