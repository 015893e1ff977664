SELECT stream, published FROM @ns@.publish_counts()
