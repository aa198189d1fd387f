r"""Checksums of the HER2ST files (almaan/her2st, commit 85df7411), checked after every download.

``HER2ST_SHA256``: SHA-256 of the files comtip's data folder holds (computed from them).
``HER2ST_FILES``: every data file of the public repository, from the listing ``her2st_files.tsv`` shipped with the
package (path in the repository, git blob SHA-1, size): 36 sections A1–A6, B1–B6, C1–C6, D1–D6, E1–E3, F1–F3,
G1–G3, H1–H3, each with counts, spot file and H&E image. Every download is checked by its git blob SHA-1
(``sha1(b"blob <size>\0" + content)``), and by its SHA-256 where ``HER2ST_SHA256`` has it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib.resources import files

HER2ST_SHA256 = {
    "ST-cnts/A1.tsv.gz": "d91035e5d8a9c4ce7865e4c61446deec1a7318602d41b3220e9fcb3ce7e41fe3",
    "ST-cnts/A2.tsv.gz": "1c84f44bfc0bce6d5647b78e4598e2456f769e29f72ca52911d5bc4be81e410c",
    "ST-cnts/A3.tsv.gz": "dd0107ff76b643d7b72330c7bfe282e2b27eb7dd58b77680b0e6bcbeae95852f",
    "ST-cnts/A4.tsv.gz": "3283ba1bf1550b26119966fe06a844d815e7fc73c493943b936dd3d933c4c331",
    "ST-cnts/A5.tsv.gz": "ff40c29d552391b3a4c4f37bb8c5cefce82e4dc64a277d4b80e2425405c59722",
    "ST-cnts/A6.tsv.gz": "65b4f4d25b1afab5b6556c7a6aab2b8910562d03b173cebcf568ab7190695aec",
    "ST-cnts/C1.tsv.gz": "8383130eebf0f9f8186f006ed6b704149ba62303605a312a9080fa9901be9c20",
    "ST-cnts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
    "ST-cnts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
    "ST-cnts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
    "ST-cnts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
    "ST-cnts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
    "ST-cnts/D1.tsv.gz": "8fe13d29763b3f6a9e85322dae97e05c4ca42b57cef4b1077c88b9b7b6a980ac",
    "ST-cnts/D2.tsv.gz": "e63818ad8717b47ca949e082c1f28b9c807475b8d722a6f5c1acda7b618b5495",
    "ST-cnts/D3.tsv.gz": "0bdfa82f3a2f4c659757cbd9f9b5734f9faabc44c4ee72094bf2b8609c86e01f",
    "ST-cnts/D4.tsv.gz": "4da2a65ffdd6ce52993e4f68b3730326c00ce9304cf8aebaf125efe9997fb898",
    "ST-cnts/D5.tsv.gz": "a1592e1742913cd37f2534153467752ded6eade730d5acdc227daad55c9e551f",
    "ST-cnts/D6.tsv.gz": "3b9ab37e0cacf7956da1354c8c0ee2a7fc5e12be78ccb4d10578df36a6bf7271",
    "ST-cnts/E1.tsv.gz": "b2f572ea0a95d256cb172a9284e96b6d2ff236398d4934a992df85c96d11c4cc",
    "ST-cnts/E2.tsv.gz": "a725a87e1a74ef0c096d421664dd9100bf973e5768c28acfa9c17abb63677a95",
    "ST-cnts/E3.tsv.gz": "8030d33e51c2831f7c758ed0374baa9f121d2e2dce6decd47228ff070c7f0ac4",
    "ST-cnts/F1.tsv.gz": "187aa13f204d514851d3674dfa09b4a8d7f2676f1d40d2ef63e9e368c7cf672a",
    "ST-cnts/F2.tsv.gz": "7de4ca7c3ccb923f4d636b21a4639284c66da9d97a93e1ab6712b3c453229c04",
    "ST-cnts/F3.tsv.gz": "6b7eb2d7ff8c6a8826cfba304de2d3b87bb8e30f68d050b83007de9888546743",
    "ST-cnts/G1.tsv.gz": "396153436dfc39e199bdc01447b3f8929aef598d7064c0c24a33da00f54570ea",
    "ST-cnts/G2.tsv.gz": "9d51a5ed85bdf60069dcf51beeffba4e90e35e8630ec3b707a2453ffdd608e3b",
    "ST-cnts/G3.tsv.gz": "9fd3c8efb94239b567157860224a33417d798a65d3a28fb9982651795cb2259e",
    "ST-cnts/H1.tsv.gz": "90b391782535f38c9ab20fe8b38f44ebbfdad2201075a677a198cbef12c29b07",
    "ST-cnts/H2.tsv.gz": "e839f271f2cde0ccf8f43f4358133f066be5d75d982839eba75abd7967486a34",
    "ST-cnts/H3.tsv.gz": "5771d4793f4e1377ed066f27cdbc703d3317c81b7dd5323a175d2227c7e3ae1d",
    "ST-imgs/C2_5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    "ST-imgs/C3_5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    "ST-imgs/C4_5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    "ST-imgs/C5_5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    "ST-imgs/C6_5714_HE_BT_E2.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
    "ST-pat-lbl/A1_labeled_coordinates.tsv": "23a0a68dccd54a8397ea4066994edb7110e88373d5b3bc6e35254dda9253fa5f",
    "ST-pat-lbl/C1_labeled_coordinates.tsv": "41b6e1bbb1031480d969e725e739971cb39dbdb6e2b6d662d585bebacf093040",
    "ST-pat-lbl/D1_labeled_coordinates.tsv": "c8bf26103d1aac42611d9c85ba3db9c596b9a80ec045ca9b246b8d14d8b3c20f",
    "ST-pat-lbl/E1_labeled_coordinates.tsv": "29db60fe5b306bb982fbd2bbdd1f9c60eedf90c6ac1d56bedd3c18ed5a369829",
    "ST-pat-lbl/F1_labeled_coordinates.tsv": "3b59970f0c6ba09d8e0fc9286ace2a295bf06d36c59684162b7a8aca0e021ec5",
    "ST-pat-lbl/G2_labeled_coordinates.tsv": "8466275647ad125569ee94d099cc7b78c15028968ba1dd267a85a81c001a16ff",
    "ST-pat-lbl/H1_labeled_coordinates.tsv": "b65cbc99ed7a01281bc2eb87be87b902312e47ca91bc1f00ff351489b78434c3",
    "ST-pat-lbl/J1_labeled_coordinates.tsv": "36fa0cdccfd07ca4f77940481f893a6a8b92762bc27abd891cc246fdf2beece1",
    "ST-spotfiles/A1_selection.tsv": "e5f79223be2ea2aebb082c4759059ab7079b0132052d0944209048ac57788c5d",
    "ST-spotfiles/A2_selection.tsv": "b21f48c8492ff1d71c0d0d396dbde64735ff8fa5419bcc6f5cffe60f68d7cb09",
    "ST-spotfiles/A3_selection.tsv": "09a5434745c4ce3c6859f3af00ea414a4b947685977e97f24595e77d1a0ff78e",
    "ST-spotfiles/A4_selection.tsv": "d1e41fb1d50ea04b55743f3c67104bdde46e1aea6a086e6cfdaf5109da0d2e02",
    "ST-spotfiles/A5_selection.tsv": "1237571fecfa2809292eeb7c7ee6b7da220a516121b94a71802cbbc971dc0daa",
    "ST-spotfiles/A6_selection.tsv": "d771bdc9dcb386cce0e628339c9ff94e5392fff191790b31aba4d73ff44b7554",
    "ST-spotfiles/C1_selection.tsv": "9a5187c98d2c312064057d3bad192d4a19105b5135ff2b68f5e4547cade0954d",
    "ST-spotfiles/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    "ST-spotfiles/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    "ST-spotfiles/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    "ST-spotfiles/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    "ST-spotfiles/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    "ST-spotfiles/D1_selection.tsv": "7ba7843b52ddc2b147ee968fe9466a5d1fa0d884b51def292ce340d88da034eb",
    "ST-spotfiles/D2_selection.tsv": "5e0cadc230094060d071124cfb5ab6223d3dbb56b6aa6c3e4f8f9c8f1e329fb5",
    "ST-spotfiles/D3_selection.tsv": "e820564d7720c1fbc9910f5440368a43a2b862d617a9c107582ddb706af61a3b",
    "ST-spotfiles/D4_selection.tsv": "82e12ff5f14a9564fd0aa9755243e4412e6786fdb559210cef9c3c6ff35a05b0",
    "ST-spotfiles/D5_selection.tsv": "f19eebb34f6a031fe766715d7f97a7682e201f30097fd0fa15ebf8f34ff95853",
    "ST-spotfiles/D6_selection.tsv": "82d80015e0e789bbbfe2d6ea033da43207a1803666a0ec5b162db380b3cc1cb7",
    "ST-spotfiles/E1_selection.tsv": "a979c36f6310fff965c96f05ad290ca322d88e400b5aed2a1139fdd6f0e2da92",
    "ST-spotfiles/E2_selection.tsv": "1beeac4b7a45e432eb4d9c34460e7a2a3342f77e0bb6dcffae66ae31b1584444",
    "ST-spotfiles/E3_selection.tsv": "f0fe37cfb98e3757587d0d43d45fc734b3627d336ccab4da179548b86c5c1d9c",
    "ST-spotfiles/F1_selection.tsv": "cf479a5812c317541c7f7d6a4ebf1bfd93b0a1ab3eef35a8da15b9e76164f2f4",
    "ST-spotfiles/F2_selection.tsv": "3a9149a67b05971dfb27edb2261d9ffd2443543021356b0d46f26d8237c1a20d",
    "ST-spotfiles/F3_selection.tsv": "106ba9b275b29fd745116b8961a1a0bb39ec41d9d0433932d6b129f98a46c093",
    "ST-spotfiles/G1_selection.tsv": "0e2f630e09a7c0e1869918c0c9afebcff36b86006a6809533fb09405c831a01d",
    "ST-spotfiles/G2_selection.tsv": "abae30bb6f434cb2aae34b8ef56da6b613c840d48c49279d55f4600ad496245c",
    "ST-spotfiles/G3_selection.tsv": "6f258aa6b4d432d29f0b7ba4a9be64ac7e58fbc430523a41e4eb5bdf13127272",
    "ST-spotfiles/H1_selection.tsv": "fc9cc5bad3a1e26e48f435696259df38b500042a9565486c15fd37ab7d8f9ed6",
    "ST-spotfiles/H2_selection.tsv": "c38d3ade8b5674633097b23a66a554831193cee48ba54a7d7418291a9f5533f9",
    "ST-spotfiles/H3_selection.tsv": "430da6f95105eb660f4e8b9b688d44d0d28b3ff66fee3e201cc160ee5739a28c",
}


HER2ST_LISTING = "her2st_files.tsv"  # package data: path, git_blob_sha1, bytes of every file of the repository


@dataclass(frozen=True)
class RemoteFile:
    """A file of the public repository: its path there, its git blob SHA-1 and its size in bytes (``None``: unknown)."""

    remote: str
    git_sha1: str
    size: int | None


def local_name(remote: str) -> str | None:
    """Path in comtip's ``her2st/`` folder of a file of the repository (``None`` for files comtip does not use).

    ``data/ST-cnts/A1.tsv.gz`` -> ``ST-cnts/A1.tsv.gz``; ``data/ST-imgs/C/C2/5714_HE_BT_C2.jpg`` ->
    ``ST-imgs/C2_5714_HE_BT_C2.jpg``; ``data/ST-pat/lbl/A1_labeled_coordinates.tsv`` ->
    ``ST-pat-lbl/A1_labeled_coordinates.tsv``.
    """
    parts = remote.split("/")
    if len(parts) < 3 or parts[0] != "data":
        return None
    if parts[1] in ("ST-cnts", "ST-spotfiles") and len(parts) == 3:
        return f"{parts[1]}/{parts[2]}"
    if parts[1] == "ST-imgs" and len(parts) == 5:
        return f"ST-imgs/{parts[3]}_{parts[4]}"
    if parts[1:3] == ["ST-pat", "lbl"] and len(parts) == 4:
        return f"ST-pat-lbl/{parts[3]}"
    return None


def read_listing(path=None) -> dict[str, RemoteFile]:
    """``{local name: RemoteFile}`` of the listing (by default the one shipped with the package)."""
    source = files("comtip.datasets") / HER2ST_LISTING if path is None else path
    out: dict[str, RemoteFile] = {}
    with source.open("r", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            name = local_name(row["path"])
            if name is None:
                continue
            size = row.get("bytes") or ""
            out[name] = RemoteFile(
                row["path"], row["git_blob_sha1"].strip().lower(), int(size) if size.strip() else None
            )
    return out


HER2ST_FILES = read_listing()
