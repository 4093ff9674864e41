from django.contrib import admin

from .models import Message


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["sent", "protocol", "sender", "author", "text"]
    list_filter = ["protocol"]
    search_fields = ["text", "sender"]
