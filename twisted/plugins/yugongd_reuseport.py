from yugongd.reuseport import ReusePortParser

reuseport = ReusePortParser()
