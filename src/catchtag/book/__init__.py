"""The book's machinery, apart from the science: parameters (`params`), glue and results files
(`report`), the build (`bookbuild`), the reproduction table (`reproduction`), figures (`plots`) and
the attention viewer (`viewer`). The science modules (`catchtag.sinks`, `catchtag.tags`, ...) never
import from here."""
