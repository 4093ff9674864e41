"""The test project's one model: a note that consumers write and read through the ORM."""

from django.db import models


class Note(models.Model):
    text = models.TextField()
