file(REMOVE_RECURSE
  "/work/main/ascend310_infer/out/main"
  "/work/main/ascend310_infer/out/main.pdb"
  "CMakeFiles/main.dir/src/main.cc.o"
  "CMakeFiles/main.dir/src/main.cc.o.d"
  "CMakeFiles/main.dir/src/utils.cc.o"
  "CMakeFiles/main.dir/src/utils.cc.o.d"
)

# Per-language clean rules from dependency scanning.
foreach(lang CXX)
  include(CMakeFiles/main.dir/cmake_clean_${lang}.cmake OPTIONAL)
endforeach()
