def portal(request):
    return {"product_name": "Lifeboat"}
