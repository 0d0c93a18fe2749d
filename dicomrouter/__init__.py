"""dicomrouter: a DICOM router that makes several PACS look like one."""

__version__ = "0.1.0"
