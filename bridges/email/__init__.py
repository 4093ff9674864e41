"""The email bridge (type ``email``, in progress): ``messages.py`` is the pure translation; docs/spec/email.md.

Only the translation exists so far: parsing one mail into ``email.receive``,
threads, auto-mail and loop rules, and building replies and ``email.send``
mails as bytes. The SMTP server, the smarthost client and IMAP (``bridge.py``)
come later, on the shared inlet of ``bridges/base.py``.
"""
