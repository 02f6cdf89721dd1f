"""mailauth"""
